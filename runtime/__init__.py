"""appliance.runtime"""
