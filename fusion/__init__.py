"""coldswarm.fusion"""
