//! etcd members the tests start on loopback (Debian's `etcd-server`), and the key-value
//! interface checked against a real one: guards, ranges read in pages at one revision,
//! watches from a revision, and etcd's limits refused before anything is sent.

use crate::support::scratch;
use mint_store::kv::{Kv, KvError, Op, prefix_end};
use std::time::{Duration, Instant};

/// One etcd member, alone in its cluster, on loopback ports; stopped and removed on drop.
pub struct Etcd {
    /// Held for its drop, which stops the member.
    _member: mint_store::etcd::LocalMember,
    /// Its client endpoint, `127.0.0.1:PORT`.
    pub endpoint: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    /// Starts a member and waits (at most 30 s) until it answers.
    pub fn start(name: &str) -> Etcd {
        let member = mint_store::etcd::LocalMember::start(&scratch(&format!("etcd-{name}")), name)
            .unwrap_or_else(|e| panic!("{e}"));
        Etcd {
            endpoint: member.endpoint.clone(),
            _member: member,
        }
    }

    /// The store location of namespace `ns` on this member.
    pub fn location(&self, ns: &str) -> mint_store::Location {
        mint_store::Location::Etcd {
            endpoints: vec![self.endpoint.clone()],
            namespace: format!("/{ns}/"),
        }
    }

    /// A key-value connection to namespace `ns`.
    pub fn kv(&self, ns: &str) -> mint_store::etcd::EtcdKv {
        mint_store::etcd::EtcdKv::connect(std::slice::from_ref(&self.endpoint), &format!("/{ns}/"))
            .unwrap()
    }
}

#[test]
fn guards_ranges_and_watches_on_a_real_etcd() {
    let etcd = Etcd::start("kv");
    let kv = etcd.kv("t1");
    mint_store::kv::conformance::guards_decide_whether_a_commit_lands(&kv);
    let put = |k: &str, v: &str| Op::Put(k.into(), v.into());
    let r2 = kv.commit(&[], &[put("a", "3")]).unwrap();

    // Another namespace on the same etcd sees none of it.
    assert_eq!(etcd.kv("t2").get(b"a").unwrap(), None);

    // More writes than one commit may hold are refused before they are sent. 1,200 keys
    // take three pages of a range, all read at the first page's revision, and a read at
    // an older revision still sees a key deleted since.
    let many: Vec<Op> = (0..129).map(|i| put(&format!("p/{i:04}"), "x")).collect();
    assert!(matches!(kv.commit(&[], &many), Err(KvError::TooLarge(_))));
    for chunk in (0..1200).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<Op> = chunk
            .iter()
            .map(|i| put(&format!("p/{i:04}"), "x"))
            .collect();
        kv.commit(&[], &ops).unwrap();
    }
    let (all, rev) = kv
        .range(b"p/", &prefix_end(b"p/"), usize::MAX, None)
        .unwrap();
    assert_eq!(all.len(), 1200);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    let (some, _) = kv.range(b"p/", &prefix_end(b"p/"), 7, None).unwrap();
    assert_eq!(some.len(), 7);
    kv.commit(&[], &[Op::Delete(b"p/0000".to_vec())]).unwrap();
    let (then, at) = kv
        .range(b"p/", &prefix_end(b"p/"), usize::MAX, Some(rev))
        .unwrap();
    assert_eq!(
        (then.len(), at),
        (1200, rev),
        "a read at an older revision sees it"
    );

    // A watch from r2 replays what came after, then follows.
    let w = kv.watch(b"a", &prefix_end(b"a"), r2).unwrap();
    kv.commit(&[], &[put("a", "4")]).unwrap();
    kv.commit(&[], &[Op::Delete(b"a".to_vec())]).unwrap();
    let seen: Vec<Option<Vec<u8>>> = std::iter::from_fn(|| w.next(Duration::from_secs(2)))
        .map(|c| c.value)
        .collect();
    assert_eq!(seen, [Some(b"3".to_vec()), Some(b"4".to_vec()), None]);
}

#[test]
fn an_unreachable_etcd_is_reported_by_its_endpoint() {
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let e = mint_store::Store::open_at(&mint_store::Location::Etcd {
        endpoints: vec![endpoint.clone()],
        namespace: "/mint/".into(),
    })
    .err()
    .expect("nothing listens there");
    assert!(e.to_string().contains(&endpoint), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up in bounded time"
    );
    for (bad, says) in [
        ("etcd://", "names no endpoint"),
        ("etcd://db:2379", "is not an IP:PORT"),
        ("etcd://10.0.0.1:2379", "not on loopback"),
        ("zookeeper://127.0.0.1:1", "not a store mint knows"),
    ] {
        let e = mint_store::Location::parse(bad, std::path::Path::new("/x")).unwrap_err();
        assert!(e.contains(says) && e.contains("--store"), "{bad}: {e}");
    }
    assert_eq!(
        mint_store::Location::parse(
            "etcd://127.0.0.1:1,127.0.0.1:2/site-a",
            std::path::Path::new("/x")
        ),
        Ok(mint_store::Location::Etcd {
            endpoints: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            namespace: "/site-a/".into()
        })
    );
}

fn node(name: &str) -> mint_model::records::Node {
    mint_model::records::Node {
        name: name.into(),
        cpus: 2,
        memory_mib: 1024,
        arch: "x86_64".into(),
        labels: Default::default(),
        properties: Default::default(),
        state: mint_model::NodeState::Free,
        instance: None,
        load: 0,
        cached: Vec::new(),
    }
}

#[test]
fn a_deposed_leaders_commits_are_fenced_and_write_nothing() {
    use mint_store::{Fencing, LEADER_KEY, StoreError};
    let etcd = Etcd::start("fence");
    let store = mint_store::Store::open_at(&etcd.location("fence")).unwrap();
    let leases = store.leases().expect("etcd has leases");
    let within = Duration::from_secs(5);
    let ttl = Duration::from_secs(5);

    // Not leading: nothing is written.
    store.set_fencing(Fencing::NotLeading);
    let e = store.add_node(&node("n0"), "admin").unwrap_err();
    assert!(matches!(e, StoreError::Fenced(_)), "{e}");

    // Leading with the leader key's create-revision as the token: commits land.
    let first = leases.grant(ttl, within).unwrap();
    let (won, held) = leases.claim(LEADER_KEY, b"first", first, within).unwrap();
    let token = held.unwrap().create_rev;
    assert!(won);
    let (lost, _) = leases
        .claim(
            LEADER_KEY,
            b"second",
            leases.grant(ttl, within).unwrap(),
            within,
        )
        .unwrap();
    assert!(!lost, "the key is held");
    store.set_fencing(Fencing::Token(token));
    store.add_node(&node("n1"), "admin").unwrap();
    assert!(leases.renew(first, within).unwrap() > 0);

    // The lease ends (as when a paused leader misses its renewals) and another daemon
    // takes the key: the first one's commits are refused and change nothing.
    leases.revoke(first, within).unwrap();
    let second = leases.grant(ttl, within).unwrap();
    let (won, held) = leases.claim(LEADER_KEY, b"second", second, within).unwrap();
    assert!(won);
    assert!(held.unwrap().create_rev > token, "tokens only grow");
    let e = store.add_node(&node("n2"), "admin").unwrap_err();
    assert!(
        matches!(&e, StoreError::Fenced(m) if m.contains(&token.to_string())),
        "{e}"
    );
    store.set_fencing(Fencing::Off);
    let names: Vec<String> = store.nodes().unwrap().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["n1"]);
    assert_eq!(store.leader().unwrap().unwrap().0, b"second".to_vec());
    // A lease that has ended renews to nothing.
    assert_eq!(leases.renew(first, within).unwrap_or(0), 0);
}

#[test]
fn a_followers_reads_come_from_a_cache_the_watch_keeps_current() {
    use mint_store::Fencing;
    let etcd = Etcd::start("cache");
    let leader = mint_store::Store::open_at(&etcd.location("cache")).unwrap();
    leader.add_node(&node("n1"), "admin").unwrap();
    let follower = mint_store::Store::open_at(&etcd.location("cache")).unwrap();
    follower.start_read_cache().unwrap();
    follower.set_fencing(Fencing::NotLeading);
    let tokens = |s: &mint_store::Store| s.tokens().unwrap().len();
    assert_eq!(tokens(&follower), tokens(&leader));
    // A change the other store commits reaches the follower's reads through the watch.
    let before = leader.events(None, usize::MAX).unwrap().len();
    leader.add_node(&node("n2"), "admin").unwrap();
    leader.remove_node("n1", "admin").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = follower.events(None, usize::MAX).unwrap().len();
        if seen == before + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache saw {seen} events, not {}",
            before + 2
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        follower.events(None, usize::MAX).unwrap().len(),
        leader.events(None, usize::MAX).unwrap().len()
    );
    // The cache is what answers: with etcd gone, the follower still reads.
    drop(etcd);
    assert_eq!(follower.events(None, usize::MAX).unwrap().len(), before + 2);
}
