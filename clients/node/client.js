// Node.js client for vlm.v1.VisionLanguageService, built at load time from the same
// protos/vlm/v1/vlm.proto that the gateway serves (no hand-written message types).
'use strict';

const fs = require('node:fs');
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

/**
 * The channel's credentials: TLS when `caFile` (the authority that signed the gateway's certificate,
 * PEM; default $VLM_CA_FILE) or `certFile` is set, trusting Node's authorities where `caFile` is not;
 * `certFile` with its `keyFile` (default $VLM_CERT_FILE, $VLM_KEY_FILE) for mutual TLS. Otherwise plain text.
 */
function channelCredentials({ caFile = process.env.VLM_CA_FILE, certFile = process.env.VLM_CERT_FILE,
  keyFile = process.env.VLM_KEY_FILE } = {}) {
  if (Boolean(certFile) !== Boolean(keyFile)) {
    throw new Error('certFile and keyFile ($VLM_CERT_FILE, $VLM_KEY_FILE) go together: a client certificate '
      + 'needs its private key');
  }
  if (!caFile && !certFile) return grpc.credentials.createInsecure();
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(caFile), read(keyFile), read(certFile));
}

/**
 * A client for `address` (host:port) that sends `apiKey` as a bearer token on every call; `caFile`,
 * `certFile` and `keyFile` for TLS (see channelCredentials).
 */
function createClient(address, apiKey, { timeoutMs = 60000, ...tls } = {}) {
  const stub = new vlm.VisionLanguageService(address, channelCredentials(tls));
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

/**
 * A Video message: `source` is the encoded file (a Buffer: MP4 H.264, WebM VP8/VP9 or animated GIF)
 * or an http(s) URL the service fetches; `fps` (frames sampled per second) and `maxFrames` (the most
 * frames) left at 0 get the service's defaults, 2 and 32.
 */
function video(source, { fps = 0, maxFrames = 0 } = {}) {
  const sampling = { fps, max_frames: maxFrames };
  if (Buffer.isBuffer(source)) return { data: source, ...sampling };
  if (typeof source === 'string' && /^https?:\/\//.test(source)) return { url: source, ...sampling };
  throw new TypeError(`cannot send ${typeof source} ${String(source).slice(0, 40)} as a video: give a Buffer `
    + '(the file\'s bytes) or an http(s) URL');
}

/**
 * One user turn: images (Buffers) first, then videos (each a `video(...)`, or a Buffer or URL sampled
 * at the service's defaults), then the prompt.
 */
function userRequest(model, prompt, images = [], config = {}, videos = []) {
  const parts = images.map((data) => ({ image: { data } }));
  for (const clip of videos) {
    const ready = typeof clip === 'object' && clip !== null && !Buffer.isBuffer(clip); // a video(...)
    parts.push({ video: ready ? clip : video(clip) });
  }
  parts.push({ text: prompt });
  return { model, messages: [{ role: 'user', parts }], config };
}

module.exports = { createClient, channelCredentials, userRequest, video, status: grpc.status };
