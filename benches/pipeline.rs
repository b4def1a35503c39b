//! Criterion benchmarks of the pure request path: no sockets, no runtime.
//!
//! Every stage runs on the realistic input the load test's webhooks are
//! made from (`bench/webhook.form`: a 1,024-byte, 30-parameter `<Gather>`
//! callback with `Digits`, a `CallToken` and a dozen `%`-escapes;
//! `bench/bodies.py` varies its `CallSid` and `Digits`), and
//! `pipeline/prepare_speech` on the 2 KB speech webhook of the load
//! test's second set. The stages add
//! up only roughly to the `pipeline/prepare` total (3.41 against 3.64 µs in
//! one run): `stage/re_sign` signs from the start, where `prepare` resumes
//! the verification's hash state at the first encrypted field, and parsing
//! the query, sorting and building the upstream request have no stage of
//! their own.
//!
//! ```text
//! cargo bench --bench pipeline              # all of them
//! cargo bench --bench pipeline -- prepare   # one
//! ```
//!
//! Results and how to read them: `bench/RESULTS.md`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::request::Parts;
use http::Request;

use ivrguard::access_log::AccessRecord;
use ivrguard::cipher::{FieldCipher, FieldKey};
use ivrguard::config::Settings;
use ivrguard::form::{self, FieldSet, DEFAULT_FIELDS};
use ivrguard::logging::{JsonLines, Scrubber, ScrubbingMakeWriter};
use ivrguard::metrics::Metrics;
use ivrguard::pipeline::Proxy;
use ivrguard::secret::Secret;
use ivrguard::signature::Verifier;

/// The webhook body; the load test (`bench/run.sh`) sends the same bytes.
const BODY: &[u8] = include_bytes!("../bench/webhook.form");
const TOKEN: &str = "bench-auth-token-not-a-secret-0001";
/// The seed document's published test key.
const KEY_HEX: &str = "a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d";
const ORIGIN: &str = "https://ivr.example.com";
const PATH_AND_QUERY: &str = "/ivr/gather?step=card";

fn settings() -> Settings {
    settings_with("")
}

/// The app's own token (`upstream.auth_token`, the shipped examples'
/// setup): re-signing cannot resume from the verification's state.
fn settings_with_app_token() -> Settings {
    settings_with("auth_token_env = \"BENCH_APP_TOKEN\"")
}

fn settings_with(upstream_extra: &str) -> Settings {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ivrguard.toml");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[upstream]
url = "http://127.0.0.1:9"
{upstream_extra}
[twilio]
auth_token_env = "BENCH_TOKEN"
public_url = "{ORIGIN}"
[encryption]
key_env = "BENCH_KEY"
"#
    );
    std::fs::write(&path, toml).expect("write config");
    let env = HashMap::from([
        ("BENCH_TOKEN".to_string(), TOKEN.to_string()),
        ("BENCH_KEY".to_string(), KEY_HEX.to_string()),
        (
            "BENCH_APP_TOKEN".to_string(),
            "bench-app-token-not-a-secret-0002".to_string(),
        ),
    ]);
    Settings::load(&path, &env).expect("bench config is valid")
}

fn verifier() -> Verifier {
    Verifier::new(&Secret::from(TOKEN.to_string()), None, &[])
}

fn cipher() -> FieldCipher {
    FieldCipher::new(&FieldKey::from_hex(KEY_HEX).expect("key"))
}

fn params<'p>(pairs: &'p [form::FormPair<'_>]) -> Vec<(&'p str, &'p str)> {
    pairs
        .iter()
        .map(|p| (p.name.as_ref(), p.value.as_ref()))
        .collect()
}

/// The signature Twilio would send for `BODY` to `ORIGIN + PATH_AND_QUERY`.
fn twilio_signature() -> String {
    signature_of(BODY)
}

fn signature_of(body: &[u8]) -> String {
    let pairs = form::parse(body).expect("body parses");
    verifier().sign(&format!("{ORIGIN}{PATH_AND_QUERY}"), &params(&pairs))
}

/// The 2 KB speech webhook of the load test's second set
/// (`bench/bodies.py speech`): the same call, with an 872-character
/// `SpeechResult` (its spaces, commas, apostrophes and accented letters
/// escaped) and a `Confidence` instead of `Digits`.
fn speech_body() -> Vec<u8> {
    let spoken = "my account number is the one ending in four two, please send the \
        card to the new address on Calle Mayor in Málaga, apartment B floor two, and \
        the postcode is twenty nine thousand fifteen. I'd like to pay the full balance \
        today from my savings account, yes that's right, José Núñez speaking. ";
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(BODY)
        .into_owned()
        .filter(|(name, _)| name != "Digits" && name != "FinishedOnKey")
        .collect();
    pairs.push(("Confidence".into(), "0.93".into()));
    pairs.push(("SpeechResult".into(), spoken.repeat(3).trim_end().into()));
    pairs.sort();
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
        .into_bytes()
}

/// The request head as Twilio sends it, for `BODY`.
fn parts(signature: &str) -> Parts {
    parts_for(signature, BODY.len())
}

fn parts_for(signature: &str, content_length: usize) -> Parts {
    let (parts, ()) = Request::post(PATH_AND_QUERY)
        .header("host", "ivr.example.com")
        .header("user-agent", "TwilioProxy/1.1")
        .header("accept", "*/*")
        .header("cache-control", "max-age=259200")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", content_length)
        .header("x-home-region", "us1")
        .header(
            "i-twilio-idempotency-token",
            "5f2c1a9e-3b7d-4c21-9a0e-8d6f4b2c1e07",
        )
        .header("x-twilio-signature", signature)
        .body(())
        .expect("valid request head")
        .into_parts();
    parts
}

/// The caller's address, as a server has it from `accept` (not parsed per
/// request: parsing it took 0.07 µs of `pipeline/prepare`).
fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

/// Each stage on its own.
fn stages(c: &mut Criterion) {
    let verifier = verifier();
    let cipher = cipher();
    let fields = FieldSet::new(DEFAULT_FIELDS.iter().copied());
    // When hyper handed the head over (the server reads the clock for its
    // latency anyway; not part of what is measured).
    let handed_over = std::time::Instant::now();
    let url = format!("{ORIGIN}{PATH_AND_QUERY}");
    let signature = twilio_signature();
    let head = parts(&signature);
    let pairs = form::parse(BODY).expect("body parses");

    let mut group = c.benchmark_group("stage");
    group.throughput(Throughput::Elements(1));

    group.bench_function("form_parse", |b| {
        b.iter(|| {
            let mut arena = form::Arena::default();
            let pairs = form::parse_in(black_box(BODY), &mut arena, &fields).expect("parses");
            black_box(&pairs);
        })
    });

    let decoded = params(&pairs);
    group.bench_function("signature_verify", |b| {
        b.iter(|| {
            verifier
                .verify(black_box(&url), black_box(&decoded), &head.headers)
                .expect("valid")
        })
    });

    let mut out = Vec::with_capacity(128);
    group.bench_function("cipher_encrypt_one_field", |b| {
        b.iter(|| {
            out.clear();
            cipher.encrypt_hex_into(black_box(b"4242424242424242"), &mut out);
        })
    });

    group.bench_function("form_rewrite", |b| {
        b.iter_batched(
            || form::parse(BODY).expect("parses"),
            |mut pairs| {
                form::rewrite(BODY, &mut pairs, &fields, |plain, out| {
                    cipher.encrypt_hex_into(plain, out)
                })
                .expect("Digits is sensitive")
            },
            BatchSize::SmallInput,
        )
    });

    let mut rewritten_pairs = form::parse(BODY).expect("parses");
    let rewritten = form::rewrite(BODY, &mut rewritten_pairs, &fields, |plain, out| {
        cipher.encrypt_hex_into(plain, out)
    })
    .expect("Digits is sensitive");
    let resign_params = params(&rewritten_pairs);
    group.bench_function("re_sign", |b| {
        b.iter(|| verifier.sign(black_box(&url), black_box(&resign_params)))
    });
    drop(rewritten);

    group.bench_function("access_record_start", |b| {
        b.iter(|| AccessRecord::start(black_box(&head), peer(), &fields, handed_over))
    });
    // A GET webhook carries all 30 parameters in the query.
    group.bench_function("redacted_query_30_params", |b| {
        b.iter(|| form::redacted(black_box(BODY), &fields))
    });

    // One access line: the JSON line formatter and the scrubber, into a
    // sink (the queue to the writer thread is not included).
    let settings = settings();
    let scrubber = Arc::new(Scrubber::new(&settings.log));
    let subscriber = tracing_subscriber::fmt()
        .event_format(JsonLines)
        .with_writer(ScrubbingMakeWriter::new(std::io::sink, scrubber))
        .finish();
    let mut record = AccessRecord::start(&head, peer(), &fields, handed_over);
    record.set_call_sid("CA9f8e7d6c5b4a39281706f5e4d3c2b1a0");
    record.add_encrypted("Digits");
    record.upstream_status = Some(200);
    tracing::subscriber::with_default(subscriber, || {
        group.bench_function("access_log_line", |b| {
            b.iter(|| record.emit(200, std::time::Duration::from_micros(412)))
        });
    });
    group.finish();
}

/// Heads copied per untimed step of `pipeline/prepare` (about 1 MB).
const HEADS_PER_CHUNK: u64 = 1_000;

/// The whole pure path: `AccessRecord::start` (redacted query) and
/// `Proxy::prepare` (classify, parse, verify, encrypt, rewrite, re-sign,
/// build the upstream request).
fn pipeline(c: &mut Criterion) {
    let settings = settings();
    let cipher = Arc::new(FieldCipher::new(&settings.encryption.key));
    let proxy = Proxy::new(&settings, cipher, Arc::new(Metrics::new()));
    let fields = FieldSet::new(settings.encryption.fields.iter().cloned());
    let handed_over = std::time::Instant::now();
    let head = parts(&twilio_signature());
    let body = Bytes::from_static(BODY);

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(1));
    let prepare_with = |proxy: &Proxy, parts: Parts, body: Bytes| {
        let mut log = AccessRecord::start(&parts, peer(), &fields, handed_over);
        let request = proxy
            .prepare(parts, body, peer(), &mut log)
            .expect("the bench request is valid");
        (request, log)
    };
    let prepare_one = |parts: Parts, body: Bytes| prepare_with(&proxy, parts, body);
    // What a server does per request: the request and record are dropped
    // before the next one, so their memory is reused. Only the copies of
    // the head (Twilio's request as hyper hands it over) are made untimed.
    group.bench_function("prepare", |b| {
        in_chunks(b, &head, |parts| {
            drop(black_box(prepare_one(parts, body.clone())))
        })
    });
    // The 2 KB speech webhook: a kilobyte more to hash, to decode, to
    // encrypt and to spell out in hex.
    let speech = Bytes::from(speech_body());
    let speech_head = parts_for(&signature_of(&speech), speech.len());
    group.bench_function("prepare_speech", |b| {
        in_chunks(b, &speech_head, |parts| {
            drop(black_box(prepare_one(parts, speech.clone())))
        })
    });
    // The same with the app's own token (`upstream.auth_token`, as the
    // shipped examples run): the forwarded request is signed from the
    // start with another key.
    let with_app_token = settings_with_app_token();
    let app_token_proxy = Proxy::new(
        &with_app_token,
        Arc::new(FieldCipher::new(&with_app_token.encryption.key)),
        Arc::new(Metrics::new()),
    );
    group.bench_function("prepare_app_token", |b| {
        in_chunks(b, &head, |parts| {
            drop(black_box(prepare_with(
                &app_token_proxy,
                parts,
                body.clone(),
            )))
        })
    });
    // The same, with the caches as a busy server leaves them. In the load
    // test, other work (the kernel's TCP, hyper, the generator and the app
    // on the same two cores) runs between two requests of a worker, and
    // `prepare` took 8–11 µs there against about 3.6 here. Before each
    // request, untimed: 4 MiB of other memory is read (four times this
    // machine's 1 MiB L2), evicting the proxy's keys, tables and the heap
    // from L1 and L2; then the request's head and body are made anew, warm,
    // as hyper hands them over just after reading them.
    let mut evict = vec![0u64; 4 << 20 >> 3];
    group.bench_function("prepare_cold_caches", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for round in 0..iters {
                for (i, word) in evict.iter_mut().enumerate().step_by(8) {
                    *word = word.wrapping_add(round ^ i as u64);
                }
                black_box(&evict);
                let parts = head.clone();
                let body = Bytes::copy_from_slice(BODY);
                let started = std::time::Instant::now();
                drop(black_box(prepare_one(parts, body)));
                total += started.elapsed();
            }
            total
        })
    });
    // criterion's `iter_batched` keeps every output of a batch alive until
    // the batch is timed, so the heap grows and is trimmed inside the timed
    // region (page faults were ~19 % of its samples): kept for comparison.
    group.bench_function("prepare_outputs_kept", |b| {
        b.iter_batched(
            || head.clone(),
            |parts| prepare_one(parts, body.clone()),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Times `run` on copies of `head` made untimed, `HEADS_PER_CHUNK` at a
/// time: what a server does per request, the head as hyper hands it over.
fn in_chunks(b: &mut criterion::Bencher<'_>, head: &Parts, mut run: impl FnMut(Parts)) {
    b.iter_custom(|iters| {
        let mut total = std::time::Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let chunk = left.min(HEADS_PER_CHUNK);
            let mut heads: Vec<Parts> = (0..chunk).map(|_| head.clone()).collect();
            let started = std::time::Instant::now();
            for parts in heads.drain(..) {
                run(parts);
            }
            total += started.elapsed();
            left -= chunk;
        }
        total
    })
}

/// The same job done plainly, as baselines measured in the same run.
///
/// `naive_…`: `form_urlencoded` into owned pairs, sort, concatenate,
/// HMAC-SHA1 with a fresh key state, compare; encrypt `Digits` (key schedule
/// built once, `thread_rng` nonce); re-serialise the body; HMAC the new
/// pairs. It checks and produces what `prepare` does for this input, without
/// the upstream request, and spends about half its time in `malloc`/`free`.
///
/// `straightforward_…`: the issue's loop without that waste (see there).
fn baseline(c: &mut Criterion) {
    use aes_gcm::aead::{Aead, KeyInit};
    use base64::Engine;
    use hmac::Mac;
    use rand::RngCore;

    fn sign(url: &str, pairs: &[(String, String)]) -> String {
        let mut sorted = pairs.to_vec();
        sorted.sort();
        let mut data = url.to_string();
        for (name, value) in &sorted {
            data.push_str(name);
            data.push_str(value);
        }
        let mut mac =
            <hmac::Hmac<sha1::Sha1> as Mac>::new_from_slice(TOKEN.as_bytes()).expect("any key");
        mac.update(data.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    let url = format!("{ORIGIN}{PATH_AND_QUERY}");
    let expected = twilio_signature();
    let key = hex::decode(KEY_HEX).expect("hex key");
    let aes = aes_gcm::Aes256Gcm::new_from_slice(&key).expect("32-byte key");
    // The seed's wire format: hex(nonce ++ ciphertext ++ tag), a fresh
    // `thread_rng` nonce each time.
    let seal = |plain: &str| {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = aes
            .encrypt(aes_gcm::Nonce::from_slice(&nonce), plain.as_bytes())
            .expect("encrypt");
        let mut wire = nonce.to_vec();
        wire.extend_from_slice(&sealed);
        hex::encode(wire)
    };
    let mut group = c.benchmark_group("baseline");
    group.throughput(Throughput::Elements(1));
    group.bench_function("naive_parse_sort_hmac_twice_encrypt", |b| {
        b.iter(|| {
            let pairs: Vec<(String, String)> = form_urlencoded::parse(black_box(BODY))
                .map(|(n, v)| (n.into_owned(), v.into_owned()))
                .collect();
            let given = sign(&url, &pairs);
            assert!(bool::from(subtle::ConstantTimeEq::ct_eq(
                given.as_bytes(),
                expected.as_bytes()
            )));
            let mut out = form_urlencoded::Serializer::new(String::new());
            let mut rewritten = pairs.clone();
            for (name, value) in &mut rewritten {
                if name == "Digits" {
                    *value = seal(value);
                }
                out.append_pair(name, value);
            }
            (out.finish(), sign(&url, &rewritten))
        })
    });

    // The loop the issue describes ("parse-sort-HMAC-twice-encrypt", about
    // 4–5 µs on its machine), written without waste: pairs borrowed from
    // the body (`Cow`), sorted by reference, the HMAC key state made once
    // and cloned, one `Digits` encrypted, the new pairs signed again. No
    // body is re-serialised and no upstream request is built, so it does
    // less than `prepare`; serialising the pairs with `form_urlencoded`
    // adds about 1.7 µs.
    let keyed = <hmac::Hmac<sha1::Sha1> as Mac>::new_from_slice(TOKEN.as_bytes()).expect("any key");
    let sign_borrowed = |pairs: &[(Cow<'_, str>, Cow<'_, str>)]| {
        let mut sorted: Vec<&(Cow<'_, str>, Cow<'_, str>)> = pairs.iter().collect();
        sorted.sort();
        let mut mac = keyed.clone();
        mac.update(url.as_bytes());
        for (name, value) in sorted {
            mac.update(name.as_bytes());
            mac.update(value.as_bytes());
        }
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    };
    group.bench_function("straightforward_parse_sort_hmac_twice_encrypt", |b| {
        b.iter(|| {
            let mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> =
                form_urlencoded::parse(black_box(BODY)).collect();
            let given = sign_borrowed(&pairs);
            assert!(bool::from(subtle::ConstantTimeEq::ct_eq(
                given.as_bytes(),
                expected.as_bytes()
            )));
            for (name, value) in &mut pairs {
                if name == "Digits" {
                    *value = Cow::Owned(seal(value));
                }
            }
            (sign_borrowed(&pairs), pairs)
        })
    });
    group.finish();
}

/// What each request adds to the metrics: `Metrics::request` (sharded per
/// worker) against prometheus-client's `Family` lookup and `Histogram`
/// (what it used before), on one thread and on two threads at once (two
/// workers; each iteration is one request per thread).
fn metrics(c: &mut Criterion) {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

    let ours = Metrics::new();
    let family = Family::<[(&'static str, &'static str); 1], Counter>::default();
    let histogram = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
    let theirs = |latency: f64| {
        family.get_or_create(&[("outcome", "forwarded")]).inc();
        histogram.observe(latency);
    };
    let ours_once = |latency: f64| ours.request("forwarded", latency);

    let mut group = c.benchmark_group("metrics");
    group.throughput(Throughput::Elements(1));
    group.bench_function("request_sharded_1_thread", |b| {
        b.iter(|| ours_once(black_box(0.000_412)))
    });
    group.bench_function("request_prometheus_client_1_thread", |b| {
        b.iter(|| theirs(black_box(0.000_412)))
    });
    fn two_threads(iters: u64, record: &(dyn Fn(f64) + Sync)) -> std::time::Duration {
        let started = std::time::Instant::now();
        std::thread::scope(|scope| {
            for worker in 0..2 {
                scope.spawn(move || {
                    ivrguard::worker::set_index(worker);
                    for _ in 0..iters {
                        record(black_box(0.000_412));
                    }
                });
            }
        });
        started.elapsed()
    }
    group.bench_function("request_sharded_2_threads", |b| {
        b.iter_custom(|iters| two_threads(iters, &ours_once))
    });
    group.bench_function("request_prometheus_client_2_threads", |b| {
        b.iter_custom(|iters| two_threads(iters, &theirs))
    });
    group.finish();
}

criterion_group!(benches, stages, pipeline, baseline, metrics);
criterion_main!(benches);
