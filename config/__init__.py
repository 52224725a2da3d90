"""Configuration: pydantic-validated TOML for agents, simulated sites and device profiles.

Depends on the standard library and pydantic only.
"""

from .agent import AgentConfig, load_agent_config
from .errors import ConfigError
from .profiles import DataType, Point, Profile, Table, load_profile
from .site import SiteConfig, load_site

__all__ = ["AgentConfig", "ConfigError", "DataType", "Point", "Profile", "SiteConfig", "Table",
           "load_agent_config", "load_profile", "load_site"]
