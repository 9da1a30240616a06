"""training_tools"""
