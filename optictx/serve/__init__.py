"""optictx.serve"""
