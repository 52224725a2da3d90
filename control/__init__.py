"""lmt.control"""
