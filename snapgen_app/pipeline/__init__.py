"""snapgen_app/pipeline"""
