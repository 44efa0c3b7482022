"""Deployment: certificates and node keys, Flower SuperLink/SuperNode processes, `privrec deploy local`."""
