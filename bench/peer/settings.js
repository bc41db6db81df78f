// The settings both peers take from the environment: DATABASE_URL, PEER_BIND (host:port) and
// PEER_JWT_SECRET. A missing one stops the peer with exit code 2.
"use strict";

function setting(peer, name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${peer} peer: ${name} must be set`);
    process.exit(2);
  }
  return value;
}

module.exports = function settings(peer) {
  const [host, port] = setting(peer, "PEER_BIND").split(":");
  return {
    databaseUrl: setting(peer, "DATABASE_URL"),
    host,
    port: Number(port),
    secret: setting(peer, "PEER_JWT_SECRET"),
  };
};
