"""Rollouts: sampling, rewards, rejection sampling and evaluation."""
