"""optictx.model"""
