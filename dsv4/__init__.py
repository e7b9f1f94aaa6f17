"""dsv4: a decoder built on DeepSeek V4's long-context attention (CSA / HCA / sliding window + sink)."""

from dsv4.config import ConfigError, ModelConfig
from dsv4.model import DSV4Model, ModelOutput, build_model

__all__ = ["ConfigError", "DSV4Model", "ModelConfig", "ModelOutput", "build_model"]
