// A net/http server for tests/threads.rs: each request fans work out to four goroutines
// and joins them; the answer counts hits (atomically) and requests per path (under a mutex),
// so a restored server shows it kept its state.
package main

import (
	"fmt"
	"net/http"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
)

func main() {
	var hits int64
	var mu sync.Mutex
	seen := map[string]int{}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		n := atomic.AddInt64(&hits, 1)
		// Work spread over goroutines, joined before answering.
		var wg sync.WaitGroup
		sums := make([]int, 4)
		for i := range sums {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				for j := 0; j < 10000; j++ {
					sums[i] += j % (i + 2)
				}
			}(i)
		}
		wg.Wait()
		mu.Lock()
		seen[r.URL.Path]++
		count := seen[r.URL.Path]
		mu.Unlock()
		fmt.Fprintf(w, "hits=%d path=%s count=%d sums=%v procs=%d\n", n, r.URL.Path, count, sums, runtime.GOMAXPROCS(0))
	})
	addr := ":8080"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	fmt.Println("listening on", addr)
	if err := http.ListenAndServe(addr, nil); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
}
