"""optictx.data"""
