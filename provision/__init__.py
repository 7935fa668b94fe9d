"""appliance.provision"""
