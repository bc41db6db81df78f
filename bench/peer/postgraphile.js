// A PostGraphile v4 peer with simple subscriptions (@graphile/pg-pubsub), measured by
// `relay-bench --mode fanout --peer postgraphile` (or `--peer postgraphile-ids`) in the relay's
// place. `postgraphile.sql`, which the benchmark applies to the run's database first, notifies
// `postgraphile:admins` and `postgraphile:user:<id>` for each event; a client subscribes over
// WebSocket (graphql-ws's `graphql-transport-ws` protocol, its JWT in the connection's
// `authorization` parameter) to
//
//   subscription { listen(topic: "admins", initialEvent: true) {
//     relatedNode { ... on Event { id row at } } } }
//
// and PostGraphile reads the event back from `peer.events` for each subscriber, in a transaction
// that sets the token's claims; or (`--peer postgraphile-ids`) to `{ relatedNodeId }` alone,
// which PostGraphile sends without a query. The token is verified when the subscription starts,
// and `peer.may_listen` decides whether its claims may listen to the topic. The initial event
// comes once the subscription has started; its LISTEN follows within moments, and the benchmark
// waits a second before its first phase.
//
// Settings come from the environment: DATABASE_URL, PEER_BIND (host:port), PEER_JWT_SECRET.
// GET /health answers 200 once the schema is built.
"use strict";

const http = require("node:http");
const { postgraphile, makePluginHook, enhanceHttpServerWithSubscriptions } = require("postgraphile");
const { default: PgPubsub } = require("@graphile/pg-pubsub");

const { databaseUrl, host, port, secret } = require("./settings")("postgraphile");

const middleware = postgraphile(databaseUrl, "peer", {
  pluginHook: makePluginHook([PgPubsub]),
  subscriptions: true,
  simpleSubscriptions: true,
  websockets: ["v1"],
  subscriptionEventEmitterMaxListeners: 0,
  // pg-pubsub's own option; it hands it to the schema as `pgSubscriptionAuthorizationFunction`.
  subscriptionAuthorizationFunction: "peer.may_listen",
  jwtSecret: secret,
  // The relay's tokens carry no audience, and their `role` is the app's, not a Postgres role.
  jwtVerifyOptions: { algorithms: ["HS256"], audience: [] },
  jwtRole: ["pg_role"],
  disableQueryLog: true,
  retryOnInitFail: false,
});

const server = http.createServer((req, res) => {
  if (req.url === "/health") {
    res.writeHead(200).end();
  } else {
    middleware(req, res);
  }
});
enhanceHttpServerWithSubscriptions(server, middleware);

process.on("SIGTERM", () => process.exit(0));

middleware
  .getGraphQLSchema()
  .then(() => server.listen(port, host))
  .catch((error) => {
    console.error("postgraphile peer: cannot start:", error);
    process.exit(1);
  });
