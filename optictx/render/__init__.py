"""optictx.render"""
