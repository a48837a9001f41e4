// Node.js client for vlm.v1.VisionLanguageService, built at load time from the same
// protos/vlm/v1/vlm.proto that the gateway serves (no hand-written message types).
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'protos', 'vlm', 'v1', 'vlm.proto');
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const vlm = grpc.loadPackageDefinition(definition).vlm.v1;

function deadline(ms) {
  return new Date(Date.now() + ms);
}

/** A client for `address` (host:port) that sends `apiKey` as a bearer token on every call. */
function createClient(address, apiKey, { timeoutMs = 60000 } = {}) {
  const stub = new vlm.VisionLanguageService(address, grpc.credentials.createInsecure());
  const metadata = () => {
    const md = new grpc.Metadata();
    if (apiKey) md.set('authorization', `Bearer ${apiKey}`);
    return md;
  };
  return {
    /** Resolves to the whole GenerateResponse. */
    generate(request) {
      return new Promise((resolve, reject) => {
        stub.Generate(request, metadata(), { deadline: deadline(timeoutMs) },
          (error, response) => (error ? reject(error) : resolve(response)));
      });
    },
    /** Async iterator over GenerateStreamResponse messages. */
    generateStream(request) {
      return stub.GenerateStream(request, metadata(), { deadline: deadline(timeoutMs) });
    },
    /** Resolves to the list of ModelInfo. */
    listModels() {
      return new Promise((resolve, reject) => {
        stub.ListModels({}, metadata(), { deadline: deadline(timeoutMs) },
          (error, response) => (error ? reject(error) : resolve(response.models)));
      });
    },
    close() {
      stub.close();
    },
  };
}

/** One user turn with images (Buffers) first, then the prompt. */
function userRequest(model, prompt, images = [], config = {}) {
  const parts = images.map((data) => ({ image: { data } }));
  parts.push({ text: prompt });
  return { model, messages: [{ role: 'user', parts }], config };
}

module.exports = { createClient, userRequest, status: grpc.status };
