%% bench_counter, version 2.  Same module name as ../bench_counter.erl; the
%% benchmark compiles it into a separate directory and loads its .beam with
%% code:load_binary/3 while version-1 processes are alive.
%%
%% State: #{count => integer(), step => integer()}.  `inc` adds `step` (10).
-module(bench_counter).
-behaviour(gen_server).
-vsn(2).

-export([start/0, start/1, inc/1, get/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2,
         terminate/2, code_change/3]).

start() -> start(0).
start(Count) -> gen_server:start(?MODULE, Count, []).

inc(Pid) -> gen_server:call(Pid, inc).
get(Pid) -> gen_server:call(Pid, get).

init(Count) ->
    {ok, #{count => Count, step => 10}}.

handle_call(inc, _From, #{count := C, step := Step} = State) ->
    {reply, C + Step, State#{count := C + Step}};
handle_call(get, _From, #{count := C} = State) ->
    {reply, C, State};
handle_call(_Other, _From, State) ->
    {reply, {error, unknown_call}, State}.

handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info(_Msg, State) ->
    {noreply, State}.

terminate(_Reason, _State) ->
    ok.

%% Upgrade from version 1 (OldVsn is the old module's -vsn, as
%% release_handler passes it): add the step field, keep the count.
code_change(1, #{count := C} = State, _Extra) when not is_map_key(step, State) ->
    {ok, State#{count => C, step => 10}};
%% Downgrade back to version 1.
code_change({down, 1}, State, _Extra) ->
    {ok, maps:remove(step, State)};
code_change(_OldVsn, State, _Extra) ->
    {ok, State}.
