"""Profiles: what each authorization server stores, as data (the TOML files in `builtin/`), and how to read it."""

from reaper.profiles.loader import BoundProfile, IpSettings, bind_profile, builtin_profiles, load_profile, parse_profile
from reaper.profiles.model import FIELDS, ClientMap, CredentialMap, FieldMap, LoopMap, Profile, TenantMap
from reaper.profiles.reads import credential_columns, profile_reads

__all__ = [
    "FIELDS",
    "BoundProfile",
    "ClientMap",
    "CredentialMap",
    "FieldMap",
    "IpSettings",
    "LoopMap",
    "Profile",
    "TenantMap",
    "bind_profile",
    "builtin_profiles",
    "credential_columns",
    "load_profile",
    "parse_profile",
    "profile_reads",
]
