// Command pstest-server serves Google's Pub/Sub fake (cloud.google.com/go/pubsub/v2/pstest) over gRPC on
// one address, for msgbus's integration tests (integration/_pubsub.py builds and starts it).
//
// pstest keeps everything in memory. With -journal, this program makes it survive a restart: every
// successful change (topic and subscription create/update/delete, publish, effective ack) is appended to a
// JSON-lines journal before the client gets its answer (-fsync: and fsynced), and at start-up the journal
// is replayed into a fresh fake: topics, subscriptions, and every message some subscription has not acked.
// Replayed messages get new server message ids (higher than any id handed out before, so an ack id from
// before the restart can never ack a different message); deliveries in flight are simply available again.
// The journal is then rewritten in compact form. The port opens only after the replay: open means ready.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// entry is one journal line.
type entry struct {
	Op    string            `json:"op"` // topic, deltopic, sub, delsub, pub, ack, floor
	Name  string            `json:"name,omitempty"`
	Topic json.RawMessage   `json:"topic,omitempty"`
	Sub   json.RawMessage   `json:"sub,omitempty"`
	Msgs  []json.RawMessage `json:"msgs,omitempty"`
	IDs   []string          `json:"ids,omitempty"`
	Floor int               `json:"floor,omitempty"`
}

type journal struct {
	mu    sync.Mutex
	f     *os.File
	fsync bool
}

func (j *journal) write(e *entry) error {
	if j == nil {
		return nil
	}
	line, err := json.Marshal(e)
	if err != nil {
		return err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	// One write per record, straight to the kernel: a killed process loses nothing it answered for.
	if _, err := j.f.Write(append(line, '\n')); err != nil {
		return err
	}
	if j.fsync {
		return j.f.Sync()
	}
	return nil
}

var marshal = protojson.MarshalOptions{}

func rawProto(m proto.Message) json.RawMessage {
	b, err := marshal.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// msgNumber is the numeric part of a pstest message id ("m42" -> 42), or -1.
func msgNumber(id string) int {
	if !strings.HasPrefix(id, "m") {
		return -1
	}
	n, err := strconv.Atoi(id[1:])
	if err != nil {
		return -1
	}
	return n
}

// msgID strips the delivery counter from a pstest ack id ("m42:3" -> "m42").
func msgID(ackID string) string {
	if i := strings.LastIndex(ackID, ":"); i >= 0 {
		return ackID[:i]
	}
	return ackID
}

// recorder journals the effect of each successful unary call.
type recorder struct {
	srv *pstest.Server
	j   *journal
}

func (r *recorder) acks(id string) int {
	if m := r.srv.Message(id); m != nil {
		return m.Acks
	}
	return -1
}

func (r *recorder) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	var before map[string]int
	if ack, ok := req.(*pb.AcknowledgeRequest); ok && r.j != nil {
		// pstest ignores a stale ack id (the message was redelivered since); journal only acks that took.
		before = make(map[string]int, len(ack.AckIds))
		for _, a := range ack.AckIds {
			before[msgID(a)] = r.acks(msgID(a))
		}
	}
	resp, err := handler(ctx, req)
	if err != nil || r.j == nil {
		return resp, err
	}
	var e *entry
	switch q := req.(type) {
	case *pb.Topic:
		e = &entry{Op: "topic", Topic: rawProto(resp.(*pb.Topic))}
	case *pb.UpdateTopicRequest:
		e = &entry{Op: "topic", Topic: rawProto(resp.(*pb.Topic))}
	case *pb.DeleteTopicRequest:
		e = &entry{Op: "deltopic", Name: q.Topic}
	case *pb.Subscription:
		e = &entry{Op: "sub", Sub: rawProto(resp.(*pb.Subscription))}
	case *pb.UpdateSubscriptionRequest:
		e = &entry{Op: "sub", Sub: rawProto(resp.(*pb.Subscription))}
	case *pb.DeleteSubscriptionRequest:
		e = &entry{Op: "delsub", Name: q.Subscription}
	case *pb.PublishRequest:
		e = &entry{Op: "pub", Name: q.Topic}
		for _, m := range q.Messages { // pstest filled in MessageId and PublishTime
			e.Msgs = append(e.Msgs, rawProto(m))
		}
	case *pb.AcknowledgeRequest:
		e = &entry{Op: "ack", Name: q.Subscription}
		for id, n := range before {
			if n >= 0 && r.acks(id) > n {
				e.IDs = append(e.IDs, id)
			}
		}
		if len(e.IDs) == 0 {
			return resp, nil
		}
	default:
		return resp, nil
	}
	if err := r.j.write(e); err != nil {
		return nil, fmt.Errorf("pstest-server: journal write failed: %w", err)
	}
	return resp, nil
}

// ackStream journals the acks a StreamingPull client sends. pstest applies them after RecvMsg returns,
// so these are journaled optimistically (a stale one may be recorded as an ack).
type ackStream struct {
	grpc.ServerStream
	j   *journal
	sub string
}

func (s *ackStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err != nil {
		return err
	}
	if req, ok := m.(*pb.StreamingPullRequest); ok {
		if req.Subscription != "" {
			s.sub = req.Subscription
		}
		if len(req.AckIds) > 0 {
			e := &entry{Op: "ack", Name: s.sub}
			for _, a := range req.AckIds {
				e.IDs = append(e.IDs, msgID(a))
			}
			if werr := s.j.write(e); werr != nil {
				return werr
			}
		}
	}
	return nil
}

func (r *recorder) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if r.j == nil {
		return handler(srv, ss)
	}
	return handler(srv, &ackStream{ServerStream: ss, j: r.j})
}

// state is what a journal describes, folded in order.
type state struct {
	topicOrder []string
	topics     map[string]*pb.Topic
	subOrder   []string
	subs       map[string]*pb.Subscription
	subSeq     map[string]int
	msgs       []pubbed
	acked      map[string]map[string]bool // subscription -> message ids
	floor      int                        // smallest message number not yet handed out
}

type pubbed struct {
	topic string
	seq   int
	msg   *pb.PubsubMessage
}

func readJournal(path string) (*state, error) {
	st := &state{
		topics: map[string]*pb.Topic{}, subs: map[string]*pb.Subscription{}, subSeq: map[string]int{},
		acked: map[string]map[string]bool{},
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	seq := 0
	for sc.Scan() {
		seq++
		var e entry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			log.Printf("journal line %d unreadable (a torn last write?), stopping there: %v", seq, err)
			break
		}
		if err := st.apply(&e, seq); err != nil {
			return nil, fmt.Errorf("journal line %d: %w", seq, err)
		}
	}
	return st, sc.Err()
}

func (st *state) apply(e *entry, seq int) error {
	switch e.Op {
	case "topic":
		t := &pb.Topic{}
		if err := protojson.Unmarshal(e.Topic, t); err != nil {
			return err
		}
		if _, ok := st.topics[t.Name]; !ok {
			st.topicOrder = append(st.topicOrder, t.Name)
		}
		st.topics[t.Name] = t
	case "deltopic":
		delete(st.topics, e.Name)
	case "sub":
		s := &pb.Subscription{}
		if err := protojson.Unmarshal(e.Sub, s); err != nil {
			return err
		}
		if _, ok := st.subs[s.Name]; !ok {
			st.subOrder = append(st.subOrder, s.Name)
			st.subSeq[s.Name] = seq
			st.acked[s.Name] = map[string]bool{}
		}
		st.subs[s.Name] = s
	case "delsub":
		delete(st.subs, e.Name)
		delete(st.subSeq, e.Name)
		delete(st.acked, e.Name)
	case "pub":
		for _, raw := range e.Msgs {
			m := &pb.PubsubMessage{}
			if err := protojson.Unmarshal(raw, m); err != nil {
				return err
			}
			if n := msgNumber(m.MessageId); n >= st.floor {
				st.floor = n + 1
			}
			st.msgs = append(st.msgs, pubbed{topic: e.Name, seq: seq, msg: m})
		}
	case "ack":
		if set := st.acked[e.Name]; set != nil {
			for _, id := range e.IDs {
				set[id] = true
			}
		}
	case "floor":
		if e.Floor > st.floor {
			st.floor = e.Floor
		}
	default:
		return fmt.Errorf("unknown op %q", e.Op)
	}
	return nil
}

// replay loads st into the fresh fake g and returns the compact journal that describes the result.
func replay(srv *pstest.Server, st *state) ([]*entry, error) {
	ctx := context.Background()
	g := &srv.GServer
	// Burn message ids up to the old floor, on a topic nobody subscribes to, then forget those messages.
	if st.floor > 0 {
		burn := &pb.Topic{Name: "projects/pstest-server-internal/topics/burn"}
		if _, err := g.CreateTopic(ctx, burn); err != nil {
			return nil, err
		}
		for left := st.floor; left > 0; {
			n := min(left, 1000)
			req := &pb.PublishRequest{Topic: burn.Name, Messages: make([]*pb.PubsubMessage, n)}
			for i := range req.Messages {
				req.Messages[i] = &pb.PubsubMessage{Data: []byte{0}}
			}
			if _, err := g.Publish(ctx, req); err != nil {
				return nil, err
			}
			left -= n
		}
		if _, err := g.DeleteTopic(ctx, &pb.DeleteTopicRequest{Topic: burn.Name}); err != nil {
			return nil, err
		}
		srv.ClearMessages()
	}
	var out []*entry
	for _, name := range st.topicOrder {
		t, ok := st.topics[name]
		if !ok {
			continue
		}
		created, err := g.CreateTopic(ctx, proto.Clone(t).(*pb.Topic))
		if err != nil {
			return nil, fmt.Errorf("re-create topic %s: %w", name, err)
		}
		out = append(out, &entry{Op: "topic", Topic: rawProto(created)})
	}
	live := map[string]bool{}
	for _, name := range st.subOrder {
		s, ok := st.subs[name]
		if !ok {
			continue
		}
		created, err := g.CreateSubscription(ctx, proto.Clone(s).(*pb.Subscription))
		if err != nil {
			log.Printf("not re-creating subscription %s: %v", name, err)
			continue
		}
		live[name] = true
		out = append(out, &entry{Op: "sub", Sub: rawProto(created)})
	}
	kept := 0
	for _, p := range st.msgs {
		var targets, others []string
		for _, name := range st.subOrder {
			s := st.subs[name]
			if !live[name] || s.Topic != p.topic {
				continue
			}
			if st.subSeq[name] < p.seq && !st.acked[name][p.msg.MessageId] {
				targets = append(targets, name)
			} else {
				others = append(others, name)
			}
		}
		if len(targets) == 0 {
			continue
		}
		m := proto.Clone(p.msg).(*pb.PubsubMessage)
		m.MessageId, m.PublishTime = "", nil
		resp, err := g.Publish(ctx, &pb.PublishRequest{Topic: p.topic, Messages: []*pb.PubsubMessage{m}})
		if err != nil {
			return nil, fmt.Errorf("re-publish to %s: %w", p.topic, err)
		}
		kept++
		out = append(out, &entry{Op: "pub", Name: p.topic, Msgs: []json.RawMessage{rawProto(m)}})
		for _, name := range others { // a subscription that had acked it, or did not exist yet
			id := resp.MessageIds[0]
			if _, err := g.Acknowledge(ctx, &pb.AcknowledgeRequest{Subscription: name, AckIds: []string{id}}); err != nil {
				return nil, err
			}
			out = append(out, &entry{Op: "ack", Name: name, IDs: []string{id}})
		}
	}
	floor := st.floor + kept
	out = append([]*entry{{Op: "floor", Floor: floor}}, out...)
	log.Printf("replayed %d topics, %d subscriptions, %d unacked messages (ids from m%d)",
		len(st.topics), len(live), kept, st.floor)
	return out, nil
}

func rewrite(path string, entries []*entry, fsync bool) (*journal, error) {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return nil, err
	}
	w := bufio.NewWriter(f)
	for _, e := range entries {
		line, err := json.Marshal(e)
		if err != nil {
			return nil, err
		}
		w.Write(append(line, '\n'))
	}
	if err := w.Flush(); err != nil {
		return nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, err
	}
	f.Close()
	if err := os.Rename(tmp, path); err != nil {
		return nil, err
	}
	jf, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	return &journal{f: jf, fsync: fsync}, nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8085", "host:port to serve the Pub/Sub gRPC API on")
	journalPath := flag.String("journal", "", "journal file that makes state survive a restart (empty: in memory only)")
	fsync := flag.Bool("fsync", false, "fsync the journal after every record (survives power loss, slower)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	// pstest listens on its own loopback port too; clients use ours, which adds the journal and larger
	// message limits (pstest's own server keeps gRPC's 4 MiB default; Pub/Sub accepts 10 MB).
	srv := pstest.NewServerWithAddress("127.0.0.1:0")
	var j *journal
	if *journalPath != "" {
		st, err := readJournal(*journalPath)
		if err != nil {
			log.Fatalf("reading journal %s: %v", *journalPath, err)
		}
		entries, err := replay(srv, st)
		if err != nil {
			log.Fatalf("replaying journal %s: %v", *journalPath, err)
		}
		if j, err = rewrite(*journalPath, entries, *fsync); err != nil {
			log.Fatalf("rewriting journal %s: %v", *journalPath, err)
		}
	}
	rec := &recorder{srv: srv, j: j}
	gs := grpc.NewServer(
		grpc.MaxRecvMsgSize(64<<20),
		grpc.MaxSendMsgSize(64<<20),
		grpc.UnaryInterceptor(rec.unary),
		grpc.StreamInterceptor(rec.stream),
	)
	pb.RegisterPublisherServer(gs, &srv.GServer)
	pb.RegisterSubscriberServer(gs, &srv.GServer)
	pb.RegisterSchemaServiceServer(gs, &srv.GServer)
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("listen %s: %v", *addr, err)
	}
	log.Printf("pstest-server serving on %s (journal %q, fsync %v)", lis.Addr(), *journalPath, *fsync)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-sigs
		log.Printf("%v: stopping", sig)
		done := make(chan struct{})
		go func() { gs.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second): // streaming pulls never end by themselves
			gs.Stop()
		}
	}()
	if err := gs.Serve(lis); err != nil {
		log.Fatalf("serve: %v", err)
	}
	if j != nil {
		j.f.Close()
	}
	log.Printf("stopped")
}
