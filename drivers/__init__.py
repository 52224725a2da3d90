"""lmt.drivers"""
