"""snapgen_app/model"""
