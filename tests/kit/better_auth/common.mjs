// Shared by v13/server.mjs, v16/server.mjs and v17/server.mjs: Node built-ins only, so that each
// version's own node_modules (better-auth, pg) stay the only packages in play.
//
// Environment:
//   DATABASE_URL  postgres://... (required)
//   PORT          port to bind on 127.0.0.1 (default 0: the kernel picks one; READY tells which)
//   BA_SECRET     Better Auth secret (default: a fixed 40-character test secret)
//
// Protocol: prints exactly one line "READY <port>" on stdout once migrated and listening; on
// SIGTERM/SIGINT closes the HTTP server and the pg pool, then exits 0. Errors go to stderr, exit 1.
import http from "node:http";

export const HOST = "127.0.0.1";
export const BASE_PATH = "/api/auth";

export function settings() {
  const databaseUrl = process.env.DATABASE_URL;
  if (!databaseUrl) {
    process.stderr.write("DATABASE_URL is required\n");
    process.exit(2);
  }
  return {
    databaseUrl,
    port: Number(process.env.PORT ?? 0),
    secret: process.env.BA_SECRET ?? "dcr-reaper-test-secret-0123456789abcdefghij",
  };
}

/**
 * Binds first (so that a PORT of 0 is resolved before Better Auth needs its baseURL), then
 * builds auth via `setup(baseURL)` (which runs the migrations and returns { handler, close }),
 * then prints READY.
 */
export async function serve(setup) {
  const { port } = settings();
  let handler = null;
  const server = http.createServer((req, res) => {
    if (!handler) {
      res.writeHead(503).end();
      return;
    }
    handler(req, res);
  });
  server.keepAliveTimeout = 1000;
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, HOST, resolve);
  });
  const bound = server.address().port;
  const origin = `http://${HOST}:${bound}`;
  let close = async () => {};
  let stopping = false;
  const stop = async (code) => {
    if (stopping) return;
    stopping = true;
    server.closeAllConnections?.();
    await new Promise((resolve) => server.close(() => resolve()));
    try {
      await close();
    } catch (e) {
      process.stderr.write(`close failed: ${e?.stack ?? e}\n`);
    }
    process.exit(code);
  };
  process.on("SIGTERM", () => stop(0));
  process.on("SIGINT", () => stop(0));
  try {
    const made = await setup({ origin, baseURL: origin, basePath: BASE_PATH });
    handler = made.handler;
    close = made.close ?? close;
  } catch (e) {
    process.stderr.write(`setup failed: ${e?.stack ?? e}\n`);
    await stop(1);
    return;
  }
  process.stdout.write(`READY ${bound}\n`);
}

/** Runs Better Auth's own migrator (the real generated schema) and logs what it did to stderr. */
export async function migrate(getMigrations, options, label) {
  const { toBeCreated, toBeAdded, runMigrations } = await getMigrations(options);
  const created = toBeCreated.map((t) => t.table);
  const added = toBeAdded.map((t) => t.table);
  await runMigrations();
  process.stderr.write(
    `[${label}] migrated: created=${JSON.stringify(created)} added=${JSON.stringify(added)}\n`,
  );
}
