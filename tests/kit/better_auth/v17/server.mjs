// Better Auth 1.7 + @better-auth/oauth-provider (tables oauthClient, oauthRefreshToken,
// oauthAccessToken, oauthConsent, oauthResource, oauthClientResource, jwks) on PostgreSQL.
// Usage: DATABASE_URL=postgres://... PORT=0 node v17/server.mjs   (see ../common.mjs)
import { oauthProvider } from "@better-auth/oauth-provider";
import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db/migration";
import { toNodeHandler } from "better-auth/node";
import { jwt } from "better-auth/plugins/jwt";
import pg from "pg";
import { migrate, serve, settings } from "../common.mjs";

await serve(async ({ origin, baseURL, basePath }) => {
  const { databaseUrl, secret } = settings();
  const withResource = (process.env.BA_RESOURCES ?? "mcp") !== "none";
  const resource = `${origin}/mcp`;
  const pool = new pg.Pool({ connectionString: databaseUrl, max: 4 });
  const options = {
    appName: "dcr-reaper kit (better-auth 1.7)",
    baseURL,
    basePath,
    secret,
    database: pool,
    telemetry: { enabled: false },
    rateLimit: { enabled: false },
    emailAndPassword: { enabled: true, requireEmailVerification: false },
    // The oauth-provider docs: with the jwt plugin, /token (a session JWT) is not an OAuth endpoint.
    disabledPaths: ["/token"],
    plugins: [
      jwt(),
      oauthProvider({
        loginPage: `${origin}/sign-in`,
        consentPage: `${origin}/consent`,
        // What MCP clients need: RFC 7591 registration without a session or an initial token.
        allowDynamicClientRegistration: true,
        allowUnauthenticatedClientRegistration: true,
        // Defaults spelt out: scopes include offline_access (refresh tokens), refresh tokens rotate
        // (the old row gets revoked = rotatedAt = now), reuse interval 0, tokens stored hashed.
        scopes: ["openid", "profile", "email", "offline_access"],
        refreshTokenReuseInterval: 0,
        storeTokens: "hashed",
        // An RFC 8707 resource the way an MCP server is one (BA_RESOURCES=none leaves it out): an
        // authorize/token request with resource=<origin>/mcp gets a JWT access token (not stored);
        // without it, an opaque one (stored, hashed, in oauthAccessToken). Resources are enforced
        // per client by default, so every DCR client is linked to it (an oauthClientResource row).
        ...(withResource
          ? { resources: [resource], clientRegistrationDefaultResources: [resource] }
          : {}),
      }),
    ],
  };
  await migrate(getMigrations, options, "better-auth 1.7");
  const auth = betterAuth(options);
  return { handler: toNodeHandler(auth), close: () => pool.end() };
});
