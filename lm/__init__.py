"""coldswarm.lm"""
