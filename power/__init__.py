"""appliance.power"""
