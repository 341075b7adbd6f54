"""optictx.train"""
