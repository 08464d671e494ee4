"""smallbig.analysis"""
