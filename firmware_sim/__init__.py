"""lmt.firmware_sim"""
