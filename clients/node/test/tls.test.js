// Unit test (no real gateway): the Node client's TLS options against a stand-in gateway that requires
// client certificates. VLM_TEST_TLS_DIR: PEM files made by tests/unit/test_node_tls.py (ca.pem, the
// gateway's server.pem/server.key, client-ca.pem, the client's client.pem/client.key, stranger.pem).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { createClient, status } = require('../client');

const PROTO = path.join(__dirname, '..', '..', '..', 'protos', 'vlm', 'v1', 'vlm.proto');
const service = grpc.loadPackageDefinition(protoLoader.loadSync(PROTO, { keepCase: true, defaults: true }))
  .vlm.v1.VisionLanguageService.service;
const dir = process.env.VLM_TEST_TLS_DIR;
const file = (name) => path.join(dir, name);

/** A gateway stand-in serving mutual TLS: ListModels answers one model. */
async function mutualTlsGateway() {
  const server = new grpc.Server();
  server.addService(service, { ListModels: (call, callback) => callback(null, { models: [{ name: 'tls-model' }] }) });
  const credentials = grpc.ServerCredentials.createSsl(fs.readFileSync(file('client-ca.pem')),
    [{ cert_chain: fs.readFileSync(file('server.pem')), private_key: fs.readFileSync(file('server.key')) }], true);
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', credentials, (error, bound) => (error ? reject(error) : resolve(bound)));
  });
  return { server, address: `127.0.0.1:${port}` };
}

async function listWith(address, options) {
  const client = createClient(address, 'k', { timeoutMs: 5000, ...options });
  try {
    return await client.listModels();
  } finally {
    client.close();
  }
}

test('with the authority and a client certificate the client is answered over TLS', async () => {
  const gateway = await mutualTlsGateway();
  try {
    const models = await listWith(gateway.address, {
      caFile: file('ca.pem'), certFile: file('client.pem'), keyFile: file('client.key') });
    assert.deepEqual(models.map((model) => model.name), ['tls-model']);
  } finally {
    gateway.server.forceShutdown();
  }
});

test('without a client certificate, or trusting another authority, the client is refused', async () => {
  const gateway = await mutualTlsGateway();
  try {
    await assert.rejects(listWith(gateway.address, { caFile: file('ca.pem') }),
      (error) => error.code === status.UNAVAILABLE);
    await assert.rejects(listWith(gateway.address, {
      caFile: file('stranger.pem'), certFile: file('client.pem'), keyFile: file('client.key') }),
    (error) => error.code === status.UNAVAILABLE);
    assert.throws(() => createClient(gateway.address, 'k', { caFile: file('ca.pem'), certFile: file('client.pem') }),
      /certFile and keyFile/);
  } finally {
    gateway.server.forceShutdown();
  }
});
