"""smallbig.engine"""
