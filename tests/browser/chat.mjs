// Drives the web client (Converse.js served by Halyard at /) in headless Chromium for the
// end-to-end test in tests/e2e/browser.rs, which runs the server and the other (TCP) client.
//
// Protocol with the Rust side: this script prints `STEP <name>` lines on stdout when it reaches
// a step and waits for a `GO` line on stdin where the Rust side has to act first. Anything that
// goes wrong exits non-zero with the reason on stderr; screenshots of every step go to
// $ARTIFACTS.
//
// Env: URL (the page), USER, PASSWORD (the account, without domain), PEER (bare JID of the
// TCP client), ARTIFACTS (folder), CHROMIUM (browser binary), PLAYWRIGHT (playwright-core dir).

import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const env = (k) => {
  const v = process.env[k];
  if (!v) {
    console.error(`missing env ${k}`);
    process.exit(2);
  }
  return v;
};
const URL = env('URL');
const USER = env('USER');
const PASSWORD = env('PASSWORD');
const PEER = env('PEER');
const PEER_NAME = env('PEER_NAME');
const ARTIFACTS = env('ARTIFACTS');
const { chromium } = await import(join(env('PLAYWRIGHT'), 'index.mjs'));
mkdirSync(ARTIFACTS, { recursive: true });

const lines = createInterface({ input: process.stdin });
const waiting = [];
lines.on('line', (l) => waiting.shift()?.(l.trim()));
const go = () => new Promise((resolve) => waiting.push(resolve));
const step = (name) => console.log(`STEP ${name}`);

const browser = await chromium.launch({
  executablePath: env('CHROMIUM'),
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});

let shot = 0;
async function screenshot(page, what) {
  shot += 1;
  await page.screenshot({ path: join(ARTIFACTS, `${String(shot).padStart(2, '0')}-${what}.png`) });
}

/** A fresh browser context (no stored messages), logged in; returns the page. */
async function login(what) {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error(`pageerror: ${e.message}`));
  if (process.env.TRACE_WS) {
    page.on('websocket', (ws) => {
      ws.on('framesent', (f) => console.error(`>> ${String(f.payload).slice(0, 400)}`));
      ws.on('framereceived', (f) => console.error(`<< ${String(f.payload).slice(0, 400)}`));
    });
  }
  await page.goto(URL);
  await page.fill('#converse-login-jid', USER);
  await page.fill('#converse-login-password', PASSWORD);
  await screenshot(page, `${what}-login`);
  await page.click('#converse-login button[type=submit]');
  // Logged in: the roster / controlbox shows our own status.
  await page.waitForSelector('converse-user-profile, .controlbox-section', { timeout: 20000 });
  await screenshot(page, `${what}-logged-in`);
  return { ctx, page };
}

/** Opens the chat with PEER from the roster (it is a contact). */
async function openChat(page) {
  await page.locator('converse-roster-contact', { hasText: PEER_NAME }).first().click();
  await page.waitForSelector('textarea.chat-textarea', { timeout: 20000 });
}

/** Waits until `text` is shown as a message in the open chat with PEER. */
async function seeMessage(page, text) {
  await page.waitForSelector(`converse-chat-message :text("${text}")`, { timeout: 20000 });
}

try {
  // 1. Log in; the Rust side then sends a message from the TCP client.
  let { ctx, page } = await login('first');
  step('logged-in');
  const first = await go();
  await openChat(page);
  await seeMessage(page, first);
  await screenshot(page, 'received');

  // 2. Reply by typing.
  const textarea = page.locator('textarea.chat-textarea').first();
  await textarea.click();
  await textarea.type('reply typed in the browser');
  await textarea.press('Enter');
  await seeMessage(page, 'reply typed in the browser');
  await screenshot(page, 'replied');
  step('replied');

  // 3. Close the page; the Rust side sends a message meanwhile.
  await ctx.close();
  step('closed');
  const while_closed = await go();

  // 4. A fresh context (nothing cached): log in again and see all three, from the server.
  ({ ctx, page } = await login('second'));
  await openChat(page);
  await seeMessage(page, while_closed);
  await seeMessage(page, first);
  await seeMessage(page, 'reply typed in the browser');
  await screenshot(page, 'history');
  step('history');
  await ctx.close();
  await browser.close();
  process.exit(0);
} catch (e) {
  console.error(`browser test failed: ${e.stack || e}`);
  if (process.env.TRACE_WS) {
    for (const c of browser.contexts()) {
      for (const p of c.pages()) {
        const dump = await p.evaluate(() => {
          const tags = [...document.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()).filter((t) => t.startsWith('converse-'));
          const chats = [...document.querySelectorAll('converse-chat, .chatbox')].map((e) => `${e.tagName} ${e.getAttribute('jid')} hidden=${e.hidden} class=${e.className} text=${e.innerText.slice(0,200)}`);
          return { tags: [...new Set(tags)], chats };
        });
        console.error(JSON.stringify(dump, null, 1));
      }
    }
  }
  try {
    for (const c of browser.contexts()) {
      for (const p of c.pages()) await screenshot(p, 'failure');
    }
  } catch {}
  await browser.close();
  process.exit(1);
}
