/* vmha's fencing protocol, checked by `vmha model check` (Spin 6).

   One VM. Its old copy runs on host A, which holds the VM's paxos lease (or, misconfigured, runs it
   without the lease). A manager proves that copy stopped with one of the proof methods of
   vmha.locks.prover (lease-taken, request-force, exit-attested, power, host-dead), releases the lease
   and starts a new copy on host B, whose QEMU takes the lease (libvirt's sanlock lock manager).
   Property: never two writers (never_two_writers, below).

   Faults, any of them at any moment, at most MAXF in one run: A's storage path cut (no renewals),
   the management plane between manager and A cut (no attestation, A's isolation response fires),
   A's agent, A's sanlock daemon, the old copy or the manager crashing, A losing power. Repairs
   (storage back, management back, agent restarted, A powered on) are free. Message loss and
   timeouts: every wait of the manager may give up (the method fails), every attestation may be lost.
   The manager tries any method at any time: its safety must not rest on its health view. Its reads
   and its acts are separate steps, so a read may be stale when it acts (as sanlock's host states,
   which lag by up to 2 io).

   sanlock as vmha relies on it (docs: components.md, "sanlock"; vmha.locks.space):
   - A's delta lease ages while A cannot renew it: LIVE, STALE (a renewal period missed: space.renews()
     sees no move), FAIL (8 io: A's sanlock fails the lockspace and kills the lease holders), DEAD
     (8 io + 60 s: other hosts may take A's leases). By DEAD every lease holder on A has exited, or the
     watchdog has reset A (a holder that does not die, or a dead sanlock daemon that no longer feeds
     it). A crashed sanlock daemon is not restarted before that reset.
   - A lease is held while its holder runs; a holder's exit releases it on storage when A's sanlock can
     still write there. sanlock grants a lease that is free, or whose owner's host_id is DEAD or has a
     newer generation (its host rejoined).
   - A power fence that confirms "off" is right, unless it is miswired (its BMC is another machine's):
     then it confirms off while A runs. A miswired fence is the only fault of its run besides crashes
     of agent, VM and manager and management cuts: with A also cut from storage, nothing vmha reads
     could tell a miswired fence from a right one (see the variant fence-miswired-cut).

   Broken variants (a preprocessor define each; `vmha model check --broken NAME`), each must violate:
   POWER_NO_RENEWAL_CHECK  power fences a host that still renews its lockspace
   VACUOUS_LEASE           lease-taken without the leader-record check: a never-held lease is "proof"
   ATTEST_WITHOUT_LEASE    exit-attested without the leader-record check, for a VM run without its lease
   HOST_DEAD_NEVER_HELD    host-dead without the leader-record check (vmha before this model: DEAD
                           vouches only for lease holders)
   DEAD_ON_FAIL            host-dead resets the lease at FAIL, without waiting for DEAD
   NO_WATCHDOG             assumption broken: no watchdog (the lab's sanlock -w 0), so a dead sanlock
                           daemon leaves its holders running
   FENCE_MISWIRED_CUT      assumption broken: a miswired fence while A is also cut from storage
   TWO_MANAGERS            assumption broken: two managers prove at once (a deposed leader whose lease
                           reset is still in flight; the election's 0.9 TTL rule stops its decisions,
                           not a sanlock write already issued): the second one (host_id 4, new copy
                           on C) uses the methods that reset the lease, and its reset, decided on
                           owners read before the first one's new copy took the lease, clobbers it
   PROVES=<method>         not a variant: asserts that <method> never proves by its own step (REQ_FORCE,
                           attestation, fence, DEAD; not a lease found free), so that a check finding
                           the assertion false shows that the method can prove: the model is not
                           safe by doing nothing
*/

#ifndef MAXF
#ifdef TWO_MANAGERS
#define MAXF 1  /* two managers multiply the states; one fault is enough for them to overlap */
#else
#define MAXF 3
#endif
#endif

/* sanlock host_ids */
#define NOBODY 0   /* a lease's leader record after init or reset: lver 0 */
#define A 1        /* the old copy's host */
#define M 2        /* the manager's host: the Prover takes the lease through its own registration */
#define B 3        /* the new copy's host */
#define M2 4       /* TWO_MANAGERS: a second manager's host... */
#define C 5        /* ...starting its new copy on C */

/* A's delta lease, as the other hosts' sanlock sees it (space.HostState) */
#define LIVE 0
#define STALE 1
#define FAIL 2
#define DEAD 3

/* the proof methods (core.fencing.ProofMethod) */
mtype:proof = { LEASE_TAKEN, REQUEST_FORCE, EXIT_ATTESTED, POWER, HOST_DEAD }

/* host A */
bool a_on = true;         /* powered */
bool a_vm = true;         /* the old copy runs */
bool a_leased;            /* the old copy holds the VM's lease (libvirt lock_manager = "sanlock") */
bool a_sanlock = true;    /* A's sanlock daemon runs */
bool a_joined = true;     /* A's sanlock has the lockspace (space.local_state() "joined") */
bool a_agent = true;      /* A's vmha agent runs */
bool a_storage = true;    /* A reaches the shared storage */
byte a_age = LIVE;        /* A's delta lease: LIVE, STALE, FAIL, DEAD */
byte a_gen = 1;           /* A's delta-lease generation: +1 at every join */

bool mgmt = true;         /* the management plane between the manager and A */
bool miswired;            /* the power fence configured for A acts on another machine */

/* the VM's paxos lease: its leader record (space.PaxosLeader) */
byte l_owner = NOBODY;    /* owner_id; NOBODY: never acquired since init or reset (lver 0) */
byte l_gen;               /* owner_generation */
bool l_held;              /* timestamp != 0 */
bool req_force;           /* a REQ_FORCE request is flagged on the lease */

bool started[2];          /* the new copy runs: [0] on B (the manager), [1] on C (TWO_MANAGERS) */
bool m_crash[2];          /* a manager process crashes (set by World, handled by Manager) */
byte faults;

#define writers ((a_on && a_vm) + started[0] + started[1])
ltl never_two_writers { [] (writers <= 1) }

/* A's sanlock can write to storage: renew its delta lease, release a lease */
#define a_renews (a_on && a_sanlock && a_storage && a_joined && a_age < FAIL)

inline power_loss() {
	a_on = false; a_vm = false; a_sanlock = false; a_agent = false; a_joined = false
}

/* The old copy exits (crash, SIGTERM/SIGKILL): sanlock releases its lease if it can still write. */
inline vm_exits() {
	a_vm = false;
	if
	:: a_leased && a_renews && l_owner == A && l_held -> l_held = false
	:: else
	fi
}

proctype World() {
end:	do
	/* --- sanlock on A: renewal, expiry, the watchdog --- */
	:: atomic { a_renews && a_age == STALE -> a_age = LIVE }
	:: atomic { !a_renews && a_age < FAIL -> a_age++;
		if
		:: a_age == STALE -> printf("A: a renewal period without renewal (STALE)\n")
		:: else -> printf("A: 8 io without renewal: lockspace FAIL\n")
		fi }
	:: atomic { a_age == FAIL && a_on && a_vm && a_leased && a_sanlock ->
		printf("A: lockspace failed: sanlock kills the lease holder\n"); vm_exits() }
#ifndef NO_WATCHDOG
	:: atomic { a_age == FAIL && a_on && a_vm && a_leased ->
		printf("A: watchdog resets A (holder alive, lockspace failed)\n"); power_loss() }
	:: atomic { a_age == FAIL && !(a_on && a_vm && a_leased) ->
		printf("A: 8 io + 60 s without renewal: host_id DEAD\n"); a_age = DEAD }
#else
	:: atomic { a_age == FAIL && !(a_on && a_vm && a_leased && a_sanlock) ->
		printf("A: 8 io + 60 s without renewal: host_id DEAD\n"); a_age = DEAD }
#endif
	:: atomic { a_age >= FAIL && a_on && a_sanlock && a_joined && !(a_vm && a_leased) ->
		a_joined = false }  /* a failed lockspace is removed once its holders have exited */
	/* A bound for a finite state space, never reached: the same states with a bound of 20 */
	:: atomic { a_on && a_sanlock && a_storage && !a_joined && a_gen <= MAXF + 1 ->
		printf("A: sanlock joins the lockspace again (new generation)\n");
		a_joined = true; a_gen++; a_age = LIVE }
	:: atomic { req_force && a_renews && a_vm && a_leased && l_owner == A && l_held ->
		printf("A: sanlock sees REQ_FORCE at its renewal: SIGKILL the holder, release\n");
		vm_exits() }
	/* --- A's agent: the isolation response (locks.isolation.stop_lease_holders) --- */
	:: atomic { a_on && a_agent && a_sanlock && !mgmt && a_storage && a_vm && a_leased ->
		printf("A: agent isolated: isolation response stops the lease holder\n"); vm_exits() }
	/* --- faults and repairs --- */
#ifndef FENCE_MISWIRED_CUT
	:: atomic { faults < MAXF && a_storage && !miswired -> printf("fault: A cut from storage\n");
		a_storage = false; faults++ }
	:: atomic { faults < MAXF && a_sanlock && !miswired -> printf("fault: A's sanlock crashes\n");
		a_sanlock = false; faults++ }
#else
	:: atomic { faults < MAXF && a_storage -> printf("fault: A cut from storage\n");
		a_storage = false; faults++ }
	:: atomic { faults < MAXF && a_sanlock -> printf("fault: A's sanlock crashes\n");
		a_sanlock = false; faults++ }
#endif
	:: atomic { !a_storage -> printf("repair: A reaches storage\n"); a_storage = true }
	:: atomic { faults < MAXF && mgmt -> printf("fault: management plane to A cut\n");
		mgmt = false; faults++ }
	:: atomic { !mgmt -> printf("repair: management plane to A back\n"); mgmt = true }
	:: atomic { faults < MAXF && a_agent -> printf("fault: A's agent crashes\n"); a_agent = false; faults++ }
	:: atomic { a_on && !a_agent -> printf("repair: A's agent restarted\n"); a_agent = true }
	:: atomic { faults < MAXF && a_vm -> printf("fault: the old copy crashes\n"); vm_exits(); faults++ }
	:: atomic { faults < MAXF && a_on -> printf("fault: A loses power\n"); power_loss(); faults++ }
	:: atomic { !a_on -> printf("repair: A powered on (the VM does not start by itself)\n");
		a_on = true; a_sanlock = true; a_agent = true }
	:: atomic { faults < MAXF && !m_crash[0] && !started[0] -> printf("fault: the manager crashes\n");
		m_crash[0] = true; faults++ }
#ifdef TWO_MANAGERS
	:: atomic { faults < MAXF && !m_crash[1] && !started[1] -> printf("fault: the second manager crashes\n");
		m_crash[1] = true; faults++ }
#endif
	od
}

/* Prover._held_there: the leader record names A as the last owner (lver > 0, owner_id = A). */
inline held_there(skip_check) {
	if
	:: skip_check || l_owner == A -> ok = true
	:: else -> printf("manager %d: %e: lease never held on A: refused\n", me, method); ok = false
	fi
}

/* sanlock's acquire for `who`: a free lease, or one whose owner (A) rejoined or is DEAD. */
inline acquire(who) {
	if
	:: !l_held || (l_owner == A && (l_gen < a_gen || a_age == DEAD)) ->
		printf("sanlock: lease granted to host_id %d\n", who);
		l_owner = who; l_held = true; l_gen = 1; ok = true
	:: else -> ok = false
	fi
}

/* Prover._take: read the owners (held unless free or of an older generation of A; with dead_ok, all
   DEAD will do), then acquire: two steps, A may change in between. Gives up (None) otherwise. */
inline take(dead_ok) {
	ok = !l_held || (l_owner == A && l_gen < a_gen) || (dead_ok && l_owner == A && a_age == DEAD);
	if
	:: ok -> atomic { acquire(me) }
	:: else
	fi
}

/* Prover._take_until: polls _take until the method's budget ends (the wait may end at any time). */
inline take_until(dead_ok) {
	if
	:: !l_held || (l_owner == A && l_gen < a_gen) || (dead_ok && l_owner == A && a_age == DEAD) -> take(dead_ok)
	:: ok = false
	fi
}

/* Prover._reset_and_take: refuse if another host holds the lease, else reset it and take it. */
inline reset_and_take() {
	if
	:: l_held && l_owner != A -> ok = false
	:: else ->
		atomic { printf("manager %d: %e: lease reset\n", me, method); l_owner = NOBODY; l_held = false };
		take(false)
	fi
}

proctype Manager(byte me; byte dest; byte i) {
	mtype:proof method;
	bool ok;
	bool attested;
#ifdef PROVES
	bool via;  /* the method proved by its own step, not by finding the lease free */
#define witness(v) via = v
#else
#define witness(v) skip
#endif
restart:
	do
	:: started[i] -> break
	:: else ->
	{
		atomic { ok = false; witness(false); req_force = false };
		atomic {
			if
			:: i == 0 -> method = LEASE_TAKEN
			:: i == 0 -> method = REQUEST_FORCE
			:: method = EXIT_ATTESTED
			:: method = POWER
			:: i == 0 -> method = HOST_DEAD
			fi;  /* TWO_MANAGERS: the second one uses the methods that reset the lease */
			printf("manager %d: trying %e\n", me, method)
		};
		if
		:: method == LEASE_TAKEN ->
#ifdef VACUOUS_LEASE
			held_there(true);
#else
			held_there(false);
#endif
			if :: atomic { ok -> witness(true) }; take(false) :: else fi
		:: method == REQUEST_FORCE ->
			held_there(false);
			if
			:: ok ->
				take(false);
				if
				:: !ok ->
					printf("manager %d: REQ_FORCE written\n", me);
					atomic { req_force = true; witness(true) };
					take_until(false)
				:: else
				fi
			:: else
			fi
		:: method == EXIT_ATTESTED ->
#ifdef ATTEST_WITHOUT_LEASE
			held_there(true);
#else
			held_there(false);
#endif
			if
			:: ok ->
				take(false);
				if
				:: !ok ->
					/* locks.isolation.attest_exit, over the management plane; request or answer may be lost */
					if
					:: atomic { mgmt && a_on && a_agent ->
						attested = a_sanlock && !a_joined && !(a_vm && a_leased);
						printf("manager %d: agent attests ok=%d\n", me, attested) }
					:: attested = false
					fi;
					/* this daemon's own view: A stopped renewing (FAIL, DEAD) */
					if
					:: atomic { attested && a_age >= FAIL -> witness(true) }; reset_and_take()
					:: else -> ok = false
					fi
				:: else
				fi
			:: else
			fi
		:: method == POWER ->
#ifndef POWER_NO_RENEWAL_CHECK
			if
			:: a_age == LIVE -> printf("manager %d: power: A still renews: not powering it off\n", me); ok = false
			:: else -> ok = true
			fi;
#else
			ok = true;
#endif
			if
			:: ok ->
				if
				:: atomic { !miswired -> printf("manager %d: power: A confirmed off\n", me); power_loss(); witness(true) }
				:: atomic { miswired -> printf("manager %d: power: miswired fence confirms off, A runs on\n", me) }
				:: ok = false  /* not confirmed within the budget */
				fi;
				if :: ok -> reset_and_take() :: else fi
			:: else
			fi
		:: method == HOST_DEAD ->
#ifdef DEAD_ON_FAIL
			if
			:: a_age >= FAIL -> reset_and_take()
			:: ok = false
			fi
#else
#ifdef HOST_DEAD_NEVER_HELD
			ok = true;
#else
			held_there(false);
#endif
			if
			:: atomic { ok && a_age == DEAD -> witness(true) }; take_until(true)
			:: ok = false
			fi
#endif
		fi;
		req_force = false;
		if
		:: ok ->
			atomic {  /* Prover.release */
				printf("manager %d: proof by %e; lease released, starting the new copy on host_id %d\n",
				       me, method, dest);
				if :: l_owner == me && l_held -> l_held = false :: else fi
			};
#ifdef PROVES
			assert(!(method == PROVES && via));
#endif
			atomic { acquire(dest); if :: ok -> started[i] = true :: else fi }
		:: else
		fi
	} unless {
		m_crash[i] ->
		/* sanlock releases the leases of a process that died */
		atomic { if :: l_owner == me && l_held -> l_held = false :: else fi; req_force = false; m_crash[i] = false }
		goto restart
	}
	od
}

init {
	atomic {
		printf("config: host_ids: A %d, manager %d starting the new copy on B %d\n", A, M, B);
#ifdef TWO_MANAGERS
		printf("config: and at the same time manager %d starting one on C %d\n", M2, C);
#endif
		if
		:: a_leased = true; l_owner = A; l_gen = 1; l_held = true;
			printf("config: the old copy runs on A holding its lease\n")
		:: a_leased = false;  /* started without its lease: the lease file was never acquired (lver 0) */
			printf("config: the old copy runs on A WITHOUT its lease (lease never acquired, lver 0)\n")
		fi;
		if
		:: miswired = false
		:: miswired = true; printf("config: A's power fence is miswired (acts on another machine)\n")
		fi;
		run World();
		run Manager(M, B, 0)
#ifdef TWO_MANAGERS
		; run Manager(M2, C, 1)
#endif
	}
}
