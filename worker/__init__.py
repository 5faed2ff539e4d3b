"""coldswarm.worker"""
