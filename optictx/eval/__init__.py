"""optictx.eval"""
