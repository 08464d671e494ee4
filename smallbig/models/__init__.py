"""smallbig.models"""
