// A short, soft two-tone chime made with the Web Audio API (no audio file needed).

let ctx = null;
let lastPlayed = 0;
export let playCount = 0; // for tests and debugging

function audio() {
  if (!ctx) {
    const AC = globalThis.AudioContext || globalThis.webkitAudioContext;
    if (!AC) return null;
    ctx = new AC();
  }
  return ctx;
}

/** Browsers start audio suspended until a user gesture; call this from one. */
export function unlockAudio() {
  const a = audio();
  if (a && a.state === 'suspended') a.resume().catch(() => {});
}

/** Plays the chime at `volume` (0..1). Rate limited to one per 400 ms so bursts don't blare. */
export function chime(volume = 0.5, { mention = false } = {}) {
  const now = Date.now();
  if (volume <= 0 || now - lastPlayed < 400) return false;
  lastPlayed = now;
  playCount += 1;
  const a = audio();
  if (!a) return false;
  const t0 = a.currentTime + 0.01;
  const gain = a.createGain();
  gain.connect(a.destination);
  gain.gain.setValueAtTime(0.0001, t0);
  gain.gain.exponentialRampToValueAtTime(Math.max(0.0002, 0.25 * volume), t0 + 0.015);
  gain.gain.exponentialRampToValueAtTime(0.0001, t0 + 0.35);
  const tones = mention ? [880, 1318.5] : [660, 880];
  tones.forEach((f, i) => {
    const osc = a.createOscillator();
    osc.type = 'sine';
    osc.frequency.setValueAtTime(f, t0 + i * 0.09);
    osc.connect(gain);
    osc.start(t0 + i * 0.09);
    osc.stop(t0 + 0.36);
  });
  return true;
}
