"""Speed: the attention backend, regional torch.compile and step caches of a run, planned before the load
and applied to the loaded experts (all through diffusers' own dispatcher, compile helper and cache hooks)."""
from engine.speed.options import ATTENTION_CHOICES, CACHE_CHOICES, COMPILE_CHOICES, MIN_CACHE_STEPS, SpeedOptions
from engine.speed.plan import SpeedPlan, plan_speed

__all__ = ["ATTENTION_CHOICES", "CACHE_CHOICES", "COMPILE_CHOICES", "MIN_CACHE_STEPS", "SpeedOptions", "SpeedPlan",
           "plan_speed"]
