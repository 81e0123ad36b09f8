"""Vedas model package (the repository root, installed as ``vedas``)."""

from .configuration_vedas import Vedas25Config, VedasConfig
from .modeling_vedas import Vedas25ForConditionalGeneration, VedasForConditionalGeneration

__all__ = ["VedasConfig", "Vedas25Config", "VedasForConditionalGeneration", "Vedas25ForConditionalGeneration"]
