// Unit test (no real gateway): video parts as the Node client sends them, received raw by a stand-in
// gateway on loopback. VLM_TEST_VIDEO: an encoded clip (tests/unit/test_node_video.py makes one with
// PyAV); VLM_TEST_REQUEST_OUT: where the request's bytes are written, for Python's vlm_pb2 to parse.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { createClient, userRequest, video } = require('../client');

const PROTO = path.join(__dirname, '..', '..', '..', 'protos', 'vlm', 'v1', 'vlm.proto');
const Generate = protoLoader.loadSync(PROTO, { keepCase: true, defaults: true, oneofs: true })[
  'vlm.v1.VisionLanguageService'].Generate;
const clip = fs.readFileSync(process.env.VLM_TEST_VIDEO);
const image = Buffer.from('\x89PNG stand-in');

/** A server whose Generate keeps each request's bytes as they arrived and answers "ok". */
async function standInGateway() {
  const received = [];
  const server = new grpc.Server();
  server.addService({
    Generate: { ...Generate, requestDeserialize: (bytes) => bytes },
  }, {
    Generate(call, callback) {
      received.push(call.request);
      callback(null, { text: 'ok' });
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(),
      (error, bound) => (error ? reject(error) : resolve(bound)));
  });
  return { server, received, address: `127.0.0.1:${port}` };
}

test('videos go after the images and before the prompt, each with its sampling', async () => {
  const gateway = await standInGateway();
  const client = createClient(gateway.address, 'k');
  try {
    const request = userRequest('qwen2.5-vl', 'What happens?', [image], { max_tokens: 8 },
      [video(clip, { fps: 1.5, maxFrames: 8 }), 'https://cdn.internal/clip.webm', clip]);
    assert.equal((await client.generate(request)).text, 'ok');
  } finally {
    client.close();
    gateway.server.forceShutdown();
  }
  const [bytes] = gateway.received;
  fs.writeFileSync(process.env.VLM_TEST_REQUEST_OUT, bytes);
  const parts = Generate.requestDeserialize(bytes).messages[0].parts;
  assert.deepEqual(parts.map((part) => part.kind), ['image', 'video', 'video', 'video', 'text']);
  const [, first, second, third] = parts.map((part) => part.video);
  assert.ok(first.data.equals(clip));
  assert.deepEqual([first.source, first.fps, first.max_frames], ['data', 1.5, 8]);
  assert.deepEqual([second.source, second.url, second.fps, second.max_frames],
    ['url', 'https://cdn.internal/clip.webm', 0, 0]);
  assert.ok(third.data.equals(clip));
  assert.equal(parts[4].text, 'What happens?');
});

test('what is neither a Buffer nor an http(s) URL is refused, naming what is taken', () => {
  assert.throws(() => video('clip.mp4'), /a Buffer .* or an http\(s\) URL/);
  assert.throws(() => userRequest('qwen2.5-vl', 'hi', [], {}, [42]), TypeError);
});
