// Better Auth 1.6 + its built-in mcp plugin (legacy oidcProvider tables: oauthApplication,
// oauthAccessToken, oauthConsent) on PostgreSQL.
// Usage: DATABASE_URL=postgres://... PORT=0 node v16/server.mjs   (see ../common.mjs)
import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db/migration";
import { toNodeHandler } from "better-auth/node";
import { mcp } from "better-auth/plugins";
import pg from "pg";
import { migrate, serve, settings } from "../common.mjs";

await serve(async ({ origin, baseURL, basePath }) => {
  const { databaseUrl, secret } = settings();
  const pool = new pg.Pool({ connectionString: databaseUrl, max: 4 });
  const options = {
    appName: "dcr-reaper kit (better-auth 1.6)",
    baseURL,
    basePath,
    secret,
    database: pool,
    telemetry: { enabled: false },
    rateLimit: { enabled: false },
    emailAndPassword: { enabled: true, requireEmailVerification: false },
    plugins: [
      // /mcp/register accepts anyone (no session needed); refresh tokens need offline_access;
      // a refresh adds a new oauthAccessToken row and leaves the old one as it was (no rotation).
      mcp({
        loginPage: `${origin}/sign-in`,
        oidcConfig: {
          loginPage: `${origin}/sign-in`,
          consentPage: `${origin}/consent`, // used only when authorize is called with prompt=consent
          requirePKCE: true,
        },
      }),
    ],
  };
  await migrate(getMigrations, options, "better-auth 1.6");
  const auth = betterAuth(options);
  return { handler: toNodeHandler(auth), close: () => pool.end() };
});
