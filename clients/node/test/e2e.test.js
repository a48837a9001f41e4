// Runs against a live gateway: VLM_GATEWAY_ADDRESS, VLM_API_KEY, VLM_TEST_IMAGE (a PNG path) and
// VLM_TEST_VIDEO (an MP4 path).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { createClient, userRequest, video, status } = require('../client');

const address = process.env.VLM_GATEWAY_ADDRESS;
const apiKey = process.env.VLM_API_KEY;
const image = fs.readFileSync(process.env.VLM_TEST_IMAGE);
const clip = fs.readFileSync(process.env.VLM_TEST_VIDEO);
const client = createClient(address, apiKey);

test.after(() => client.close());

test('lists both models and the router as ready', async () => {
  const models = await client.listModels();
  assert.deepEqual(models.map((m) => m.name).sort(), ['auto', 'pixtral', 'qwen2.5-vl']);
  assert.ok(models.every((m) => m.ready));
});

test('auto answers from one of the models and says how', async () => {
  const answer = await client.generate(userRequest('auto', 'What is in the picture?', [image], { max_tokens: 4 }));
  assert.ok(['qwen2.5-vl', 'pixtral'].includes(answer.model));
  assert.equal(answer.route.attempts.at(-1).model, answer.model);
  assert.notEqual(answer.route.reason, 'ROUTE_REASON_UNSPECIFIED');
  assert.equal(answer.route.images.length, 1);
});

for (const model of ['qwen2.5-vl', 'pixtral']) {
  test(`${model}: the joined stream equals the unary answer`, async () => {
    const request = userRequest(model, 'What is in the picture?', [image], { max_tokens: 16 });
    const answer = await client.generate(request);
    assert.equal(answer.finish_reason, 'FINISH_REASON_LENGTH');
    assert.equal(answer.usage.completion_tokens, 16);
    assert.ok(answer.usage.image_tokens > 0);
    let joined = '';
    let last;
    for await (const message of client.generateStream(request)) {
      joined += message.text;
      last = message;
    }
    assert.equal(joined, answer.text);
    assert.equal(last.finish_reason, 'FINISH_REASON_LENGTH');
  });
}

test('auto sends a clip to Qwen2.5-VL, sampled as asked', async () => {
  const ask = (maxFrames) => client.generate(userRequest('auto', 'What moves?', [], { max_tokens: 4 },
    [video(clip, { fps: 2, maxFrames })]));
  const [fewer, more] = [await ask(4), await ask(8)];
  assert.equal(more.model, 'qwen2.5-vl');
  assert.equal(more.route.reason, 'ROUTE_REASON_VIDEO');
  assert.equal(more.usage.completion_tokens, 4);
  assert.ok(more.usage.prompt_tokens > fewer.usage.prompt_tokens, 'more frames, more prompt tokens');
});

test('a video sampled out of bounds is INVALID_ARGUMENT naming its field', async () => {
  const request = userRequest('qwen2.5-vl', 'hi', [], {}, [video(clip, { fps: 99 })]);
  await assert.rejects(client.generate(request), (error) => {
    assert.equal(error.code, status.INVALID_ARGUMENT);
    assert.match(error.details, /messages\[0\]\.parts\[0\]\.video\.fps/);
    return true;
  });
});

test('a bad parameter is INVALID_ARGUMENT naming the field', async () => {
  const request = userRequest('pixtral', 'hi', [], { temperature: 9 });
  await assert.rejects(client.generate(request), (error) => {
    assert.equal(error.code, status.INVALID_ARGUMENT);
    assert.match(error.details, /config\.temperature/);
    return true;
  });
});

test('a wrong key is UNAUTHENTICATED', async () => {
  const stranger = createClient(address, 'not-a-key');
  await assert.rejects(stranger.listModels(), (error) => error.code === status.UNAUTHENTICATED);
  stranger.close();
});
