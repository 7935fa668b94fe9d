"""appliance.image"""
