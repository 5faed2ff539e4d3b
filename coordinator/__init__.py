"""coldswarm.coordinator"""
