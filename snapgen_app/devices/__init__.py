"""snapgen_app/devices"""
