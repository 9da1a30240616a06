"""snapgen_app/runtime"""
