"""Generated from protos/agentrun/v1 by `make gen`. Do not edit."""
