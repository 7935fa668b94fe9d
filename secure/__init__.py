"""appliance.secure"""
