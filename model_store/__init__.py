"""model_store"""
