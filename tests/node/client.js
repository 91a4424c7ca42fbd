// A Node.js client of the platform's gRPC services, built at run time from protos/ with @grpc/proto-loader:
// it creates a repository, tags a commit in it, reads the tag back, and asks for a tag that does not exist.
//
// Input, one JSON document on standard input:
//   {"include_dirs": [...], "registry": "host:port", "tagging": "host:port", "api_key": "vers_...",
//    "repo_name": "...", "tag_name": "...", "commit_id": "..."}
// include_dirs hold protos/, google/api/*.proto and google/protobuf/*.proto.
// Output, one JSON document on standard output: what each call answered (see `main`), for
// tests/test_polyglot_node.py to compare with the REST API's view. Any unexpected failure exits 1 with
// the gRPC status on standard error.
"use strict";

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_FILES = ["vers/registry/v1/registry.proto", "vers/tagging/v1/tagging.proto"];

function loadServices(includeDirs) {
  const definition = protoLoader.loadSync(PROTO_FILES, {
    includeDirs,
    keepCase: true, // field names as the protos spell them (repo_name), as every other client sees them
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const vers = grpc.loadPackageDefinition(definition).vers;
  return { RegistryService: vers.registry.v1.RegistryService, TaggingService: vers.tagging.v1.TaggingService };
}

// A unary call as a promise; the API key goes in the `authorization` metadata, as the services expect.
function call(client, method, request, apiKey) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${apiKey}`);
  const deadline = new Date(Date.now() + 30_000);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// The status of a call that is expected to fail, by name (NOT_FOUND) as the other languages print it.
async function statusOf(promise) {
  try {
    await promise;
  } catch (error) {
    if (typeof error.code !== "number") throw error;
    return { code: grpc.status[error.code], details: error.details };
  }
  return { code: "OK", details: "" };
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

async function main() {
  const input = await readStdin();
  const { RegistryService, TaggingService } = loadServices(input.include_dirs);
  const credentials = grpc.credentials.createInsecure();
  const registry = new RegistryService(input.registry, credentials);
  const tagging = new TaggingService(input.tagging, credentials);
  const key = input.api_key;
  try {
    const repository = await call(registry, "CreateRepository", { name: input.repo_name }, key);
    const created = await call(
      tagging,
      "CreateRepositoryTag",
      { repo_name: input.repo_name, tag_name: input.tag_name, commit_id: input.commit_id },
      key,
    );
    const resolved = await call(tagging, "GetRepositoryTag", { repo_name: input.repo_name, tag_name: input.tag_name }, key);
    const missing = await statusOf(
      call(tagging, "GetRepositoryTag", { repo_name: input.repo_name, tag_name: `${input.tag_name}-missing` }, key),
    );
    const tag = resolved.tag;
    process.stdout.write(
      JSON.stringify({
        repository: { repo_id: repository.repo_id },
        created: { tag_id: created.tag_id, commit_id: created.commit_id, reference: created.reference },
        resolved: { tag_id: tag.tag_id, tag_name: tag.tag_name, commit_id: tag.commit_id, reference: tag.reference },
        missing,
      }) + "\n",
    );
  } finally {
    registry.close();
    tagging.close();
  }
}

main().catch((error) => {
  const status = typeof error.code === "number" ? `${grpc.status[error.code]}: ${error.details}` : error.stack || String(error);
  process.stderr.write(`${status}\n`);
  process.exit(1);
});
