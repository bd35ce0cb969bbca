"""One module per server: its schema as the server makes it (or as its documents show it, for servers that do
not install from PyPI), and writers that fill it the way the server does.

- `authlib`: Authlib's sqla_oauth2 mixins (the one definition of the test models) and their writers;
- `mcp_memory`: mcp-memory-service (SQLite, and a PostgreSQL port);
- `dot`: the real Django OAuth Toolkit in a subprocess (its migrations, its endpoints);
- `hydra`, `keycloak` (and a stand-in for Keycloak's Admin REST API), `spring`, `doorkeeper`, `better_auth`:
  built from the shapes their documents give, with each server's types per database.
"""
