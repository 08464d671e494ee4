"""smallbig.data"""
